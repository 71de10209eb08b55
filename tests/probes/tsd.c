/* Probe (twinvm issue #12): is CR4.TSD, set by the guest kernel (mov to CR4 at CPL0), honoured for guest user
 * code (CPL3 RDTSC must raise #GP)?  Guest: CPL0 sets CR4.TSD (or not: argv[1]=0), iretq to
 * CPL3 code that executes RDTSC then HLT; the #GP handler (vector 13) does OUT 0x80 and the
 * VMM reads the faulting RIP from the exception frame: the RDTSC (TSD honoured) or the HLT. */
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <stdlib.h>
int main(int argc,char**argv){
 int settsd = argc>1 ? atoi(argv[1]) : 1;
 int kvm=open("/dev/kvm",O_RDWR);int vm=ioctl(kvm,KVM_CREATE_VM,0);
 uint8_t*mem=mmap(0,0x200000,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS,-1,0);
 struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=0x200000,.userspace_addr=(uint64_t)mem};
 ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
 ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
 uint8_t k[]={0x0f,0x20,0xe0, 0x48,0x83,0xc8,0x04, 0x0f,0x22,0xe0,
   0x6a,0x2b, 0x68,0x00,0x70,0x00,0x00, 0x68,0x02,0x30,0x00,0x00, 0x6a,0x23, 0x68,0x00,0x11,0x00,0x00, 0x48,0xcf};
 if(!settsd) k[6]=0x00; /* or rax,0 */
 memcpy(mem+0x1000,k,sizeof k);
 uint8_t u[]={0x0f,0x31, 0xf4}; /* rdtsc; hlt (#GP at CPL3) */
 memcpy(mem+0x1100,u,sizeof u);
 uint8_t gp[]={0x66,0xba,0x80,0x00, 0xb0,0x0d, 0xee, 0xf4};
 memcpy(mem+0x1200,gp,sizeof gp);
 uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
 pml4[0]=0xa000|7; pdpt[0]=0xb000|7; for(int i=0;i<512;i++)pd[i]=((uint64_t)i<<21)|0x87;
 uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0;gdt[1]=0;gdt[2]=0x00af9b000000ffff;gdt[3]=0x00cf93000000ffff;
 gdt[4]=0x00affb000000ffff; gdt[5]=0x00cff3000000ffff;
 uint64_t tb=0x600; gdt[6]=0x0000890000000067ull|((tb&0xffffff)<<16)|((tb>>24)<<56); gdt[7]=0;
 *(uint64_t*)(mem+0x600+4)=0x8000; /* TSS.RSP0 */
 uint8_t*idt=mem+0x2000; uint64_t h=0x1200; uint8_t*e=idt+13*16;
 e[0]=h&0xff;e[1]=(h>>8)&0xff;e[2]=0x10;e[3]=0;e[4]=0;e[5]=0x8e;e[6]=(h>>16)&0xff;e[7]=(h>>24)&0xff;
 int vcpu=ioctl(vm,KVM_CREATE_VCPU,0);
 struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100};
 ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp); ioctl(vcpu,KVM_SET_CPUID2,&cp);
 struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
 struct kvm_segment cs={.base=0,.limit=0xffffffff,.selector=0x10,.type=11,.present=1,.s=1,.l=1,.g=1};
 struct kvm_segment ds={.base=0,.limit=0xffffffff,.selector=0x18,.type=3,.present=1,.db=1,.s=1,.g=1};
 s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.gdt.base=0x500;s.gdt.limit=63; s.idt.base=0x2000; s.idt.limit=0xfff;
 s.tr=(struct kvm_segment){.base=tb,.limit=0x67,.selector=0x30,.type=11,.present=1};
 s.cr0=0x80000011; s.cr3=0x9000; s.cr4=(argc>2 && atoi(argv[2]))?0x24:0x20; /* argv[2]=1: TSD set by the VMM (KVM_SET_SREGS) */ s.efer=0x500;
 if(ioctl(vcpu,KVM_SET_SREGS,&s)<0)perror("sregs");
 struct kvm_regs g={.rip=0x1000,.rflags=2,.rsp=0x8000}; ioctl(vcpu,KVM_SET_REGS,&g);
 struct kvm_run*run=mmap(0,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
 for(int ex=0;ex<100;ex++){
  if(ioctl(vcpu,KVM_RUN,0)<0){perror("run");break;}
  struct kvm_regs q; ioctl(vcpu,KVM_GET_REGS,&q); struct kvm_sregs qs; ioctl(vcpu,KVM_GET_SREGS,&qs);
  if(run->exit_reason==KVM_EXIT_IO){
   uint64_t*fr=(uint64_t*)(mem+q.rsp); printf("frame: err=%#llx rip=%#llx cs=%#llx\n",(unsigned long long)fr[0],(unsigned long long)fr[1],(unsigned long long)fr[2]);
   printf("settsd=%d: IO exit port %#x rip=%llx cs=%#x cr4=%#llx rax=%#llx rdx=%#llx -> %s\n",settsd,run->io.port,q.rip,qs.cs.selector,qs.cr4,q.rax,q.rdx,
     fr[1]==0x1100?"#GP at the RDTSC: CR4.TSD honoured":fr[1]==0x1102?"#GP at the HLT after it: RDTSC ran at CPL3, CR4.TSD NOT honoured":"?");
   return 0;
  }
  printf("exit reason %d rip=%llx cr4=%#llx\n",run->exit_reason,q.rip,qs.cr4);
  if(run->exit_reason==KVM_EXIT_SHUTDOWN||run->exit_reason==KVM_EXIT_INTERNAL_ERROR)return 1;
 }
 return 1;
}
